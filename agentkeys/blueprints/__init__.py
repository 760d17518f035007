"""HTTP edge: the only package that imports Flask."""
