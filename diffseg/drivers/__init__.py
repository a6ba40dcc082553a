"""What the command-line scripts run: training and testing (run), evaluation sweeps (sweep), ablation
grids (ablate), side-by-side comparisons (compare) and their statistics over cases and seeds (statistics),
refinement of given masks (refine), the runs that grids are made of, handed to a Hydra launcher (jobs), and the
shared error handling of the scripts (cli).

The package reads as scripts -> drivers -> models -> stages (data, diffusion, nets, inference, metrics);
nothing below the drivers imports them.
"""
