"""How spectrally sparse a matrix is, before and after the S2FT permutations: measures, figures, report."""
