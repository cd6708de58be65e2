"""Runtimes wire Actor, Oracle and Learner together: `local` runs them in one process."""
