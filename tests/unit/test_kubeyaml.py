"""plugin.backends.kubeyaml against PyYAML: the same value for every text it reads, Unsupported otherwise."""

from __future__ import annotations

import random

import pytest
import yaml

from plugin.backends import kubeyaml

KIND = """\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUMvakNDQWVhZ0F3SUJBZ0lCQURBTkJna3Foa2lHOXcw
    server: https://127.0.0.1:40425
  name: kind-kind
contexts:
- context:
    cluster: kind-kind
    namespace: shop
    user: kind-kind
  name: kind-kind
current-context: kind-kind
kind: Config
preferences: {}
users:
- name: kind-kind
  user:
    client-certificate-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSURJVENDQWdtZ0F3SUJBZ0lJUk
    client-key-data: LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpNSUlFb3dJQkFBS0NBUUVBeWp3
- name: exec-user
  user:
    exec:
      apiVersion: client.authentication.k8s.io/v1beta1
      args:
      - eks
      - get-token
      - --cluster-name
      - 'prod'
      command: aws
      env: []
      interactiveMode: IfAvailable
      provideClusterInfo: false
"""


def test_a_kind_kubeconfig_is_read_without_pyyaml():
    assert kubeyaml.load(KIND) == yaml.safe_load(KIND)


@pytest.mark.parametrize("text", [
    "a: &x 1\nb: *x\n",                       # anchors
    "a: !!str 1\n",                          # tags
    "a: {b: 1}\n",                           # flow mapping
    "a: [1, 2]\n",                           # flow sequence
    "a: |\n  text\n",                        # block scalar
    'a: "x\\ny"\n',                          # escapes
    "a: b # comment\n",                      # comment after a value
    "a: one\n  two\n",                       # multi-line plain scalar
    "a: 1.5\n", "a: 1e3\n", "a: 0o17\n", "a: 012\n", "a: 1:20\n", "a: 2026-12-01\n", "a: .inf\n",
    "a: y\n", "a: tRuE\n",                   # words PyYAML reads as strings, others as booleans
    "---\na: 1\n", "a:\tb\n", "just a scalar\n", "a: 'unterminated\n",
])
def test_outside_the_subset_is_unsupported(text):
    with pytest.raises(kubeyaml.Unsupported):
        kubeyaml.load(text)


ALPHABET = "abcXYZ019 :-#'\"_./@!&*[]{}|>%,?~\\é\t"
WORDS = ["yes", "No", "ON", "off", "true", "False", "null", "~", "", "0", "12", "-3", "+4", "1.5", "07",
         "0x1F", "1_000", "1:30", "2026-01-02", ".nan", "<<", "=", "y", "n", "https://a.b:6443/x?y=z"]


def _scalar(rng: random.Random):
    r = rng.random()
    if r < 0.3:
        return rng.choice(WORDS)
    if r < 0.4:
        return rng.choice([True, False, None, rng.randint(-10**6, 10**6)])
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 12)))


def _value(rng: random.Random, depth: int):
    r = rng.random()
    if depth > 3 or r < 0.5:
        return _scalar(rng)
    if r < 0.75:
        return {str(_scalar(rng)) if rng.random() < 0.2 else rng.choice(["name", "cluster", "user", "server",
                                                                           "exec", "args", "env", "a-b", "x.y"]):
                _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def _check(text: str) -> bool:
    """True when kubeyaml read the text (and then it equals PyYAML's reading)."""
    try:
        fast = kubeyaml.load(text)
    except kubeyaml.Unsupported:
        return False
    assert fast == yaml.safe_load(text), text
    return True


def test_generated_documents_read_as_pyyaml_reads_them():
    rng = random.Random(1260)
    read = 0
    for _ in range(3000):
        doc = {k: _value(rng, 0) for k in ("apiVersion", "clusters", "users", "contexts", "current-context")}
        text = yaml.safe_dump(doc, default_flow_style=False, allow_unicode=rng.random() < 0.5,
                              indent=rng.choice([2, 4]), width=rng.choice([80, 10**6]))
        read += _check(text)
    assert read > 150  # (222 of 3000: random scalars are mostly full of indicators) not only trivial ones


def test_mutated_documents_are_read_as_pyyaml_reads_them_or_left_to_it():
    rng = random.Random(7)
    base = KIND.splitlines()
    for _ in range(5000):
        lines = list(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            op = rng.random()
            if op < 0.25:
                lines[i] = " " * rng.randint(0, 3) + lines[i]
            elif op < 0.45:
                lines[i] = lines[i].lstrip(" ")
            elif op < 0.7:
                j = rng.randrange(len(lines[i]) + 1)
                lines[i] = lines[i][:j] + rng.choice(ALPHABET) + lines[i][j:]
            elif op < 0.85 and lines[i]:
                j = rng.randrange(len(lines[i]))
                lines[i] = lines[i][:j] + lines[i][j + 1:]
            else:
                lines.insert(i, rng.choice(lines))
        text = "\n".join(lines) + "\n"
        try:
            expected = yaml.safe_load(text)
        except yaml.YAMLError:
            with pytest.raises(kubeyaml.Unsupported):  # invalid YAML is never read, PyYAML reports it
                kubeyaml.load(text)
            continue
        try:
            assert kubeyaml.load(text) == expected, text
        except kubeyaml.Unsupported:
            pass
