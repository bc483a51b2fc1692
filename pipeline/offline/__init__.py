"""Offline work on whole data sets: readers per format, scoring, the stepwise oracle."""
