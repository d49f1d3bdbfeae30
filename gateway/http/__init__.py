"""The public HTTP edge: the tracking endpoint (open pixel, click redirect) that recipients reach."""
