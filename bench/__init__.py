"""Benchmarks of Chorus against real peers (issue 6): ``make bench`` / ``make bench-smoke``.

``run`` is the controller (scenarios, processes, tables, JSON, chart); ``loadgen`` the load-generator
worker processes; ``mqtt`` and ``ws`` the minimal client framings they speak to the peers;
``chorus_server`` the server entry point with a statistics dump; ``peers/`` the reference servers.
"""
