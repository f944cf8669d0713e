"""Not collected by itself (no test_ prefix): test_cri_client.py runs it in a child pytest and
signals that pytest while a pod runs, to check the node and pods fixtures still tear down."""

import os
import pathlib
import time


def test_wait_for_a_signal(node, pods):
    pods.run("waiting", "t-signal")
    pathlib.Path(os.environ["KCX_SIGNAL_PROBE_OUT"]).write_text(str(node.workdir))
    time.sleep(120)
