"""The benchmarks' layer (`tokeneff bench`): memory and time per step of the three algorithms (`bench`), whole steps
against TRL's GRPOTrainer (`versus_trl`), the decode step against this CPU's own limit (`decode_limit`), and the
files and subprocesses they share (`benchio`). Built on the core package; nothing in the core imports it."""
