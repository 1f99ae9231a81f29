"""Measuring a dial: held-out loss, the n-gram judge, the calibration curve and the report."""
