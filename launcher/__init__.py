"""recgpt's command line and launchers (torchrun and Ray Train); the only package that imports Ray."""
