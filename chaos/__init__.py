"""A night of faults: a seeded schedule of kills, outages and junk against a real job, then a
checker that reads only storage (`python -m chaos.run`, `make chaos`).

world.py   the real parts: an S3 server behind the fault proxy, a 3-node Ray cluster, the job
faults.py  one small function per kind of fault
schedule.py the faults a seed draws, at moments of the job's progress
check.py   the invariants, from storage alone
run.py     one seed (or several): run until done, check, write chaos/results/<seed>.json
"""
