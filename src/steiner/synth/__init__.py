"""Stage 0: truncate-and-recomplete synthesis, step DAGs, backtracking path sampling."""
