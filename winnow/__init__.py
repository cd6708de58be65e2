"""winnow: online LLM alignment. An Actor samples, an Oracle judges, a Learner learns, online."""

__version__ = "0.1.0"
