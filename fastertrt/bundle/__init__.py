"""The bundle contract's ground floor: the manifest schema, path confinement, the
per-bundle writer lock and signatures. Imports nothing heavy: the runtime, the
compiler, inspect, compare and serve all read bundles through it."""
