"""The engine side of expert placement: the manager that builds and installs a placement from
the engine config, rebalances online and records routing traces (`manager`), the trace files
(`trace`) and the host-tier cost model (`cost`). The pure planning and execution parts live in
`models/placement`. See docs/placement.md.
"""
