"""The notebooks' layer: experiment grids run in parallel (`experiments`), paired-bootstrap statistics and
verdicts (`stats`), tables and figures (`report`), `results/summary.md` (`summary`) and T-SPMO's credited tokens
shown in real completions (`credits_view`). Built on the core package; nothing in the core imports it."""
