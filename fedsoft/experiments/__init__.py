"""Run tooling (checkout only): the paper-figure runner, plots and the multi-process launcher."""
