"""Mesh planning: device and fleet specs (fleets), the cost model (cost), the search (search),
and reading compiled programs back (hlo). See docs/planner.md."""
