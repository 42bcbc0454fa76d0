"""The supervisor behind ``ftrain launch``: restarts failed or hung jobs and handles preemption."""
