"""Running builds: the scheduler (the build loop) and the process runners it drives."""
