"""``analyze``: similarities, ranks, subspace angles and attention entropies of a trained model's Q, K and V."""
