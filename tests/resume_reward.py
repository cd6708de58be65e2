"""A reward with spread on an untrained model (tests/test_resume.py): the fraction of the response's
characters that are digits, so groups are not uniform and every policy step moves the weights."""


def digits(prompts, completions, reference, **columns):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
