"""Calibration: data windows and the statistics (C_x, C_g, weight gradients) of every Linear."""
