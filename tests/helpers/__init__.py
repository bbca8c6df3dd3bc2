"""Helpers shared by the tests: tiny data, toy models, a headless browser."""
