"""Keyword spotting on audio: the detector, its service, metrics, data generator, report."""
