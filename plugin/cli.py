"""kubectl-chaos: the command line (a kubectl plugin: ``kubectl chaos ...`` runs it).

``kubectl-chaos [OPTIONS] POD`` changes limits; ``kubectl-chaos status`` lists experiments;
``kubectl-chaos completion SHELL`` prints a completion script. A word is a subcommand only as the
first argument; ``kubectl-chaos pod/status ...`` or ``kubectl-chaos [OPTIONS] -- status`` reach a
pod named "status".

Flags become a :class:`plugin.backends.ChaosRequest` in pure code (:mod:`plugin.request`); only
then is a backend opened. :func:`make_cli` takes the backend opener as an argument, so tests pass
an in-memory backend without any switch in this module.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import click

from plugin import backends
from plugin.backends import DIRECTIONS, METHODS, Backend, Connection
from plugin.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ChaosError, UsageError, one_line
from plugin.output import FORMATS, render_result, render_status
from plugin.request import Flags, build_connection, build_invocation, check_namespace

if TYPE_CHECKING:  # imported when a shell asks for completions: every other start saves ~0.5 ms
    from click.shell_completion import CompletionItem

__all__ = ["PROG", "COMPLETE_VAR", "cli", "complete_main", "kubectl_complete", "main", "make_cli"]

PROG = "kubectl-chaos"
COMPLETE_VAR = "_KUBECTL_CHAOS_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
# The apply command's internal name: never a pod name ("_" is not allowed in one), so every first
# argument that is not "status" or "completion" is taken as a pod or an option.
_APPLY = "_apply"

BackendOpener = Callable[[Connection], Backend]
Clock = Callable[[], datetime]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_APPLY_HELP = """Change a running container's CPU limit, memory limit or network bandwidth in place
(no pod re-creation, no restart) and put the originals back exactly, with --reset or when
--duration runs out.

\b
Other forms:
  kubectl-chaos status [-n NAMESPACE | -A] [-o text|json|yaml]   list active experiments
  kubectl-chaos top [-n NAMESPACE | -A] [-w] [-o text|json]      watch what they do (CPU, memory, traffic)
  kubectl-chaos completion bash|zsh|fish                         print a completion script
"""

_APPLY_EPILOG = """\b
Examples:
  kubectl chaos web-0 --set-cpu 500m --duration 5m
  kubectl chaos web-0 -c app --set-memory 256Mi --set-bandwidth 2Mbps --direction egress
  kubectl chaos -l app=web --set-bandwidth 10Mbit --duration 1h30m
  kubectl chaos web-0 --set-cpu 1000m..100m --over 5m --steps 10 --agent-address unix:///run/kubectl-chaos/agent.sock
  kubectl chaos web-0 --reset
  kubectl chaos status -A -o yaml
  kubectl chaos pod/status --set-cpu 1    (a pod named "status"; or: --set-cpu 1 -- status)

\b
Units:
  CPU        cores or millicores: 2, 0.5, 1.5, 500m (at least 10m, whole millicores)
  memory     bytes, Ki Mi Gi Ti Pi Ei (x1024) or k M G T P E (x1000): 512Mi, 2Gi, 1G, 129e6
             (at least 4Mi: a container cannot even start with less)
  bandwidth  bits/s unless a capital B says bytes: 2Mbps = 2Mbit = 2Mb/s = 2M = 2,000,000 bit/s;
             2MBps = 2MB/s = 16,000,000 bit/s; 2Mi = 2*2^20 bit/s; a plain number is bit/s;
             8kbit to 100Gbit. "2mbps" is refused as ambiguous: tc reads it as megabytes/s.
  durations  30s, 5m, 1h30m, 1.5h; a unit is required ("90" is refused, write 90s)
  latency    ms or s: 50ms (the default), 20ms, 1s; 1ms to 10s in whole milliseconds
  ingress is traffic into the pod, egress traffic out of it (as the Kubernetes annotations).

\b
Exit status:
  0  done
  1  the request failed: agent or cluster unreachable, or the change was refused
  2  usage error: a bad flag or value; nothing was sent

\b
Shell completion:
  source <(kubectl-chaos completion bash)      (or zsh, fish)
  kubectl chaos <TAB> (kubectl >= 1.26) runs kubectl_complete-chaos, installed with kubectl-chaos
"""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _ChaosGroup(click.Group):
    """Routes ``POD``/options to the apply command, ``status``/``completion`` to theirs, and turns
    every error into one line on stderr and an exit status."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands or args[0] == _APPLY:
            args = [_APPLY, *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        prog_name = prog_name or PROG
        complete_var = complete_var or COMPLETE_VAR
        words = sys.argv[1:] if args is None else list(args)
        if standalone_mode and words[:1] == [COBRA_COMPLETE]:
            # cobra's hidden completion command, which kubectl_complete-<plugin> wrappers call.
            sys.exit(kubectl_complete(self, words[1:], click.get_text_stream("stdout")))
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        sys.exit(self._run(args, prog_name, complete_var, **extra))

    def _run(self, args, prog_name: str, complete_var: str, **extra) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as err:
            click.echo(err.ctx.get_help(), err=True)
            return EXIT_USAGE
        except click.ClickException as err:
            click.echo(f"error: {one_line(err.format_message())}", err=True)
            return err.exit_code
        except ChaosError as err:
            click.echo(f"error: {err}", err=True)
            return err.exit_code
        except click.Abort:
            click.echo("error: interrupted", err=True)
            return 130
        return rv if isinstance(rv, int) else EXIT_OK


class _ApplyCommand(click.Command):
    """The apply command: its usage line is the program's own (``kubectl-chaos [OPTIONS] POD``)."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        prog = ctx.parent.command_path if ctx.parent is not None else ctx.command_path
        formatter.write_usage(prog, " ".join(self.collect_usage_pieces(ctx)))


# --- kubectl's plugin completion (cobra's protocol) ---------------------------------------------

#: The hidden word cobra programs answer completion requests on (``kubectl-chaos __complete ARGS``).
COBRA_COMPLETE = "__complete"
# cobra's ShellCompDirective bits (spf13/cobra completions.go), printed as ":<n>" after the candidates.
_DIRECTIVE_ERROR = 1
_DIRECTIVE_DEFAULT = 0  # no candidates of ours: let the shell complete file names
_DIRECTIVE_NO_FILE_COMP = 4
_DIRECTIVE_FILTER_DIRS = 16


def kubectl_complete(command: click.Command, args: list[str], out) -> int:
    """Answer a completion request the way kubectl expects from a plugin (kubectl >= 1.26).

    ``kubectl chaos web --set-<TAB>`` runs ``kubectl_complete-chaos web --set-``: ``args`` are the
    words after "chaos", the last one being completed (possibly ""). The answer is one candidate per
    line (``value<TAB>description``), then ``:<directive>``. Always exit status 0.
    """
    from click.shell_completion import ShellComplete

    words = list(args) or [""]
    directive = _DIRECTIVE_NO_FILE_COMP
    lines = []
    try:
        completer = ShellComplete(command, {}, PROG, COMPLETE_VAR)
        items = completer.get_completions(words[:-1], words[-1])
    except Exception:  # noqa: BLE001 - a half-typed command line must never print a traceback
        items, directive = [], _DIRECTIVE_ERROR
    for item in items:
        if item.type == "file":
            directive = _DIRECTIVE_DEFAULT
        elif item.type == "dir":
            directive = _DIRECTIVE_FILTER_DIRS
        else:
            help_text = one_line(item.help or "").replace("\t", " ")
            lines.append(f"{item.value}\t{help_text}" if help_text else str(item.value))
    out.write("".join(line + "\n" for line in lines) + f":{directive}\n")
    out.flush()
    return EXIT_OK


def _complete_first_word(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    # Pod names would need the cluster; the subcommands are known here, and only as the first word
    # ("kubectl-chaos -n shop status" names a pod "status").
    from click.core import ParameterSource

    if any(ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE for p in ctx.command.params if p.name):
        return []
    helps = {"status": "list active experiments", "top": "watch what the experiments do",
             "completion": "print a completion script"}
    from click.shell_completion import CompletionItem

    return [CompletionItem(name, help=text) for name, text in helps.items() if name.startswith(incomplete)]


def _complete_context(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    """Context names from the kubeconfig: --kubeconfig, else $KUBECONFIG (a path list), else ~/.kube/config."""
    import os

    given = ctx.params.get("kubeconfig")
    paths = [given] if given else (os.environ.get("KUBECONFIG") or "~/.kube/config").split(os.pathsep)
    names: list[str] = []
    for path in paths:
        import yaml

        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                doc = yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError):
            continue  # a missing or broken kubeconfig offers nothing; kubectl reports it when used
        for entry in (doc.get("contexts") if isinstance(doc, dict) else None) or []:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and name not in names:
                names.append(name)
    from click.shell_completion import CompletionItem

    return [CompletionItem(name) for name in names if name.startswith(incomplete)]


def _connection_options(func):
    for decorator in reversed(
        (
            click.option(
                "--agent-address",
                metavar="ADDRESS",
                help="Node-local mode: talk to this node's chaos-agent at unix:///path (or /path) or host:port.",
            ),
            click.option(
                "--kubeconfig",
                metavar="PATH",
                type=click.Path(),  # no checks here; a path completes as file names
                help="Cluster mode: the kubeconfig file to use.",
            ),
            click.option(
                "--context",
                metavar="NAME",
                shell_complete=_complete_context,
                help="Cluster mode: the kubeconfig context to use.",
            ),
            click.option(
                "--timeout",
                metavar="DURATION",
                help="Give up on the agent or cluster after this long (default 30s).",
            ),
        )
    ):
        func = decorator(func)
    return func


def _output_option(func):
    return click.option(
        "-o",
        "--output",
        type=click.Choice(FORMATS),
        default="text",
        show_default=True,
        help="Output format; json and yaml keep stdout machine-readable.",
    )(func)


def make_cli(open_backend: BackendOpener = backends.open_backend, clock: Clock = _utcnow) -> click.Group:
    """Build the command line around ``open_backend`` (tests pass an in-memory one) and ``clock``."""

    group = _ChaosGroup(name=PROG, context_settings=_CONTEXT, add_help_option=False)

    def run_backend(connection: Connection, action: Callable[[Backend], object]):
        backend = open_backend(connection)
        try:
            return action(backend)
        finally:
            backend.close()

    @group.command(
        _APPLY,
        cls=_ApplyCommand,
        hidden=True,
        help=_APPLY_HELP,
        epilog=_APPLY_EPILOG,
        short_help="change limits",
        no_args_is_help=True,
        context_settings=_CONTEXT,
    )
    @click.argument("pod", required=False, metavar="POD", shell_complete=_complete_first_word)
    @click.option("--set-cpu", metavar="CPU", help="New CPU limit: 500m, 0.5, 2.")
    @click.option("--set-memory", metavar="SIZE", help="New memory limit: 256Mi, 2Gi, 1G.")
    @click.option("--set-bandwidth", metavar="RATE", help="New bandwidth: 2Mbps (bits), 2MBps (bytes), 500kbit.")
    @click.option(
        "--direction",
        type=click.Choice(DIRECTIONS),
        help="Which traffic --set-bandwidth shapes: egress (out of the pod), ingress (into it) or "
        "both.  [default: both]",
    )
    @click.option("--latency", metavar="DURATION",
                  help="With --set-bandwidth: each shaped direction queues at most this long at the rate "
                  "(never fewer than 4 full frames): 20ms, 1s; 1ms to 10s, whole ms.  [default: 50ms]")
    @click.option("--duration", metavar="DURATION", help="Restore the originals after this long: 30s, 5m, 1h30m.")
    @click.option("--over", metavar="DURATION",
                  help="With a range (--set-cpu 1000m..100m): how long the ramp from start to end takes.")
    @click.option("--steps", metavar="N", help="With a range: how many steps, start and end included (default 10).")
    @click.option("-n", "--namespace", metavar="NAMESPACE", help="The pod's namespace (default: the context's).")
    @click.option("-c", "--container", metavar="NAME", help="The container (default: the pod's only one).")
    @click.option("-l", "--selector", metavar="SELECTOR", help="Cluster mode: every pod matching this label selector.")
    @click.option("--reset", is_flag=True, help="Restore the original limits now and end the experiment.")
    @click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
    @click.option(
        "--method",
        type=click.Choice(METHODS),
        help="How CPU and memory are changed: cri (UpdateContainerResources), cgroup (cgroup files) "
        "or auto.  [default: auto]",
    )
    @click.option("--force", is_flag=True, help="Go ahead where a check would refuse (e.g. memory near usage).")
    @_output_option
    @_connection_options
    @click.version_option(
        package_name="kubectl-chaos", prog_name=PROG, message="%(prog)s %(version)s", help="Show the version and exit."
    )
    def apply_command(pod, output, **params) -> int:
        invocation = build_invocation(Flags(pod=pod, **params))
        for line in invocation.readings:
            # How each value was read, before anything is sent; stderr keeps json/yaml parseable.
            click.echo(line, err=output != "text")

        def send(backend: Backend):
            request = invocation.request
            if request.namespace is None:
                request = dataclasses.replace(request, namespace=backend.default_namespace())
            return backend.reset(request) if request.reset else backend.apply(request)

        result = run_backend(invocation.connection, send)
        click.echo(render_result(result, output, clock()), nl=False)
        for target in result.targets:
            if target.error is not None:
                click.echo(f"error: {target.namespace}/{target.pod}: {one_line(target.error)}", err=True)
        return EXIT_OK if result.ok else EXIT_FAILED

    @group.command("status", context_settings=_CONTEXT, short_help="list active experiments")
    @click.option("-n", "--namespace", metavar="NAMESPACE", help="Only this namespace (default: the context's).")
    @click.option("-A", "--all-namespaces", is_flag=True, help="Experiments in every namespace.")
    @_output_option
    @_connection_options
    def status_command(namespace, all_namespaces, output, agent_address, kubeconfig, context, timeout) -> int:
        """List the active chaos experiments: original, chaos and current values, method, expiry."""
        if namespace is not None and all_namespaces:
            raise UsageError("give -n/--namespace or -A/--all-namespaces, not both")
        check_namespace(namespace)
        connection = build_connection(agent_address, kubeconfig, context, timeout)

        def query(backend: Backend):
            scope = None if all_namespaces else (namespace or backend.default_namespace())
            return scope, list(backend.status(scope))

        scope, items = run_backend(connection, query)
        if not items and output == "text":
            where = "any namespace" if scope is None else f"namespace {scope}"
            click.echo(f"No chaos experiments in {where}.", err=True)
            return EXIT_OK
        click.echo(render_status(items, output, clock()), nl=False)
        return EXIT_OK

    @group.command("top", context_settings=_CONTEXT, short_help="watch what the experiments do")
    @click.option("-n", "--namespace", metavar="NAMESPACE", help="Only this namespace (default: the context's).")
    @click.option("-A", "--all-namespaces", is_flag=True, help="Experiments in every namespace.")
    @click.option("-w", "--watch", is_flag=True, help="Keep refreshing until interrupted.")
    @click.option("--interval", metavar="DURATION", default="2s", show_default=True,
                  help="Time between refreshes (0.2s to 60s).")
    @click.option("-o", "--output", type=click.Choice(("text", "json")), default="text", show_default=True,
                  help="text: a table (refreshed in place in a terminal); json: one object per row per refresh.")
    @_connection_options
    def top_command(namespace, all_namespaces, watch, interval, output, agent_address, kubeconfig, context,
                    timeout) -> int:
        """Per experiment, measured in the kernel over the last interval: CPU used against the limit and the
        share of CFS periods throttled, the memory working set against the limit and OOM kills since the
        experiment started, and for each shaped direction the throughput, drops and queue."""
        from plugin.output import render_top
        from plugin.units import parse_duration

        if namespace is not None and all_namespaces:
            raise UsageError("give -n/--namespace or -A/--all-namespaces, not both")
        check_namespace(namespace)
        try:
            interval_s = parse_duration(interval)
        except UsageError:
            interval_s = -1.0
        if not 0.2 <= interval_s <= 60:
            raise UsageError(f'--interval: "{interval}" is out of range; give 0.2s to 60s')
        connection = build_connection(agent_address, kubeconfig, context, timeout)
        in_place = output == "text" and watch and sys.stdout.isatty()

        def show(backend: Backend) -> int:
            scope = None if all_namespaces else (namespace or backend.default_namespace())
            refreshes = backend.top(scope, interval_s, 0 if watch else 1)
            try:
                for rows in refreshes:
                    text = render_top(rows, output, clock()) if rows or output == "json" else \
                        f"No chaos experiments in {'any namespace' if scope is None else 'namespace ' + scope}.\n"
                    if in_place:
                        text = "\x1b[H\x1b[2J" + text  # home and clear: refresh in place
                    click.echo(text, nl=False)
                    sys.stdout.flush()
            finally:
                # Closed here, not left to the garbage collector: an interrupt while a row is printed
                # leaves the generator in a traceback's reference cycle, and the installed command exits
                # without the interpreter's teardown (console_main), so its cleanup (the cluster
                # backend takes its watch-until marks off) would never run.
                close = getattr(refreshes, "close", None)
                if close is not None:
                    close()
            return EXIT_OK

        # SIGTERM (`timeout`, a cancelled CI job) and SIGHUP (the terminal closed) end it like Ctrl-C,
        # so in cluster mode the watch-until mark is taken off at once instead of running out.
        import signal

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            return run_backend(connection, show)
        except KeyboardInterrupt:
            return EXIT_OK
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @group.command("completion", context_settings=_CONTEXT, short_help="print a completion script")
    @click.argument("shell", type=click.Choice(SHELLS), metavar="SHELL")
    @click.pass_context
    def completion_command(ctx: click.Context, shell: str) -> int:
        """Print the shell completion script for SHELL, e.g. source <(kubectl-chaos completion bash).

        The same script comes from _KUBECTL_CHAOS_COMPLETE=bash_source kubectl-chaos.
        """
        from click.shell_completion import get_completion_class

        completer_class = get_completion_class(shell)
        assert completer_class is not None  # SHELLS are all built into click
        completer = completer_class(ctx.find_root().command, {}, PROG, COMPLETE_VAR)
        click.echo(completer.source(), nl=False)
        return EXIT_OK

    return group


cli = make_cli()


def main(argv: list[str] | None = None) -> None:
    """The ``kubectl-chaos`` entry point; exits with 0, 1 (request failed) or 2 (usage)."""
    cli.main(args=argv, prog_name=PROG, complete_var=COMPLETE_VAR)


def console_main() -> None:
    """The installed ``kubectl-chaos`` command: :func:`main`, then out without the interpreter's
    teardown. Unloading the ~300 modules a run imports takes ~9 ms, a tenth of a cluster-mode
    run; nothing of ours needs it: connections and temporary files are closed where they are used,
    and stdout and stderr are flushed here. A crash (any other exception) ends the normal way."""
    try:
        main()
        code = EXIT_OK
    except SystemExit as e:
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        code = e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader gone (`| head`): the run's result stands
            pass
    os._exit(code)


def complete_main(argv: list[str] | None = None) -> None:
    """The ``kubectl_complete-chaos`` entry point: kubectl runs it to complete ``kubectl chaos ...``."""
    args = sys.argv[1:] if argv is None else list(argv)
    sys.exit(kubectl_complete(cli, args, click.get_text_stream("stdout")))


if __name__ == "__main__":
    main()
