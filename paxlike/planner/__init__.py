"""Mesh planning, as arithmetic: fleets of devices (fleets; the device specs are `paxlike.devices`),
the cost model (cost), the search (search), and reading compiled programs back (hlo). Compiling a
plan for a real topology builds the trainer and lives outside the planner, in `paxlike.compiled`.
See docs/planner.md."""
