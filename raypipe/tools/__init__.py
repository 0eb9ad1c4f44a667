"""Tools around the jobs: linear baselines for results, the configuration reference generator."""
