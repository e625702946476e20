"""fastgen_core: the library. Recipe schema, noise processes, networks, methods, samplers,
datasets, metrics and artifact manifests. Imports no orchestration library."""
