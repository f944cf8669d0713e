"""The chaos-agent gRPC API: ``agent.proto`` and its generated stubs in ``gen/``."""
