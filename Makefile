# kubectl-chaos: set-up, tests, demo. Run as root on Debian 12 (bookworm).
PY      ?= python3
VENV    ?= .venv
PYTEST  ?= $(VENV)/bin/pytest
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup setup-node setup-venv test test-unit test-v2 v2-image agent-image demo gen lint bench clean

setup: setup-node setup-venv

# Debian packages the node, kernel and VM tests use.
setup-node:
	scripts/setup-node.sh

setup-venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# compat: the checkout goes on sys.path through a plain .pth line, as a regular install's
	# site-packages does. The default (lenient) mode imports a path finder at every interpreter
	# start, about 10 ms, which bench/bench_cluster.py would count against kubectl-chaos's start-up.
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

# Regenerate the gRPC stubs (cri_api, agent API); tests/unit/test_generated.py checks they are fresh.
gen: setup-venv
	$(VENV)/bin/python -m cri_api.generate
	$(VENV)/bin/python -m daemonset.api.generate

lint: setup-venv
	$(VENV)/bin/ruff check .

# The test command CI runs (.ci/run): every test, none skipped.
test: setup
	$(VENV)/bin/ruff check .
	$(PYTEST) -q

test-unit: setup-venv
	$(PYTEST) -q -m unit

# The cgroup v2 worker node alone (a QEMU VM: systemd, containerd 2.x, runc and crun; one boot).
test-v2: setup
	$(PYTEST) -q -m vm tests/vm/test_v2_node.py tests/node/test_limits_both_nodes.py tests/node/test_both_nodes.py

# Build (or find, cached by its recipe) the v2 node's disk image: prints its directory.
v2-image:
	scripts/build-v2-image.sh

# Build (or find, cached by its inputs) the chaos-agent image, an OCI image layout: prints its
# directory (agent.oci.tar for `ctr -n k8s.io images import`, image.env with its name and digests).
agent-image: setup-venv
	scripts/build-agent-image.sh

demo: setup
	$(VENV)/bin/python -m scripts.demo

# The same demo on the cgroup v2 worker node VM (systemd, containerd 2.x; QEMU TCG, about a minute to
# boot). DEMO_RUNTIME=crun for crun's layout.
.PHONY: demo-v2
demo-v2: setup
	$(VENV)/bin/python -m scripts.demo --node v2 --runtime $(or $(DEMO_RUNTIME),runc)

bench: setup
	fail=0; for b in bench/bench_*.py; do $(VENV)/bin/python $$b || fail=1; done; exit $$fail

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
