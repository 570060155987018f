"""The ways `merge --combine` makes one adapter of several, apart from combine.py so the
command line lists them without importing torch."""
COMBINATIONS = {  # peft's combination types, each with what it does (merge --help lists them)
    "linear": "sums the A matrices and the B matrices, each scaled by the square root of its weight: cheap, "
              "and only roughly the weighted sum of the updates (equal ranks)",
    "svd": "the exact weighted sum of the updates, cut back by SVD to the largest rank among the adapters",
    "cat": "the adapters side by side: exactly the weighted sum of their updates, at the sum of their ranks",
    "ties": "TIES: each matrix trimmed to its largest --density share, one sign elected per entry, the values "
            "agreeing with it summed (equal ranks)",
    "dare_ties": "DARE then TIES: a random --density share of each matrix kept and rescaled by 1/density, "
                 "then TIES' sign election (equal ranks)",
    "dare_linear": "DARE: a random --density share of each matrix kept, rescaled by 1/density and summed "
                   "(equal ranks)",
}
EQUAL_RANKS = ("linear", "ties", "dare_ties", "dare_linear")  # peft sums matrices entry by entry for these
USE_DENSITY = ("ties", "dare_ties", "dare_linear")
