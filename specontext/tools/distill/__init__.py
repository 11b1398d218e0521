"""``specontext-distill``: train a retrieval head from the target model's attention (see train.py)."""
