"""Code that runs inside the VM (stdlib only): cgroup helpers and the scenario driver."""
