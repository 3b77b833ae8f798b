"""Benchmarks as commands: ``mimar bench quality`` (every method under one budget, evaluated
alike, reported with error bars: :mod:`mimar.bench.quality`, :mod:`mimar.bench.report`) and
``mimar bench speed`` (:mod:`mimar.bench.speed`).

Nothing is imported here, so that ``mimar bench speed`` does not load the quality bench.
"""
