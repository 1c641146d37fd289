"""The outer loop and its run folder: space, study, trials, final stage, Ray cluster, reward."""
