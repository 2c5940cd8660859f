"""Forecasts the planner consumes: household head-room h_t, trip energy needs, prices.

Pure models: every function takes its data and returns arrays or frozen dataclasses; reading
files and writing model files is done by `adapters.datasets`.
"""
