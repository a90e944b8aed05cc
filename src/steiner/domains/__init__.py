"""Problem domains: where problems come from and how an answer is checked."""
