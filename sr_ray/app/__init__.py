"""The application layer: jobs' command line, and (to come) the job registry and the demo chain."""
