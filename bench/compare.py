#!/usr/bin/env python3
"""Compare the CPU cost per request of PIBL, nginx and HAProxy on this machine.

Method (see bench/README.md):

* One nginx master with ``worker_processes 1`` serves a 1 KiB and a 100 KiB file on three
  loopback ports; these are the backends. The backends, wrk and this script run on one CPU
  (``--loadgen-cpu``, default 0), the proxy under test alone on another (``--proxy-cpu``,
  default 1).
* Scenarios: ``proxy`` (every request reaches a backend), ``cache`` (cache hits: PIBL's
  disk cache, nginx ``proxy_cache``, HAProxy's memory cache), ``tls`` (HTTPS termination)
  and ``logging`` (access log on and off). In each, PIBL (``--workers 1``: one worker and
  its master), nginx (``worker_processes 1``) and HAProxy (``nbthread 1``) balance round
  robin over the same three backends with upstream keep-alive, one at a time.
* For each proxy, connection mode and response size: a warm-up wrk run, then a measured
  ``wrk -t1 -c<C> -d<D>s --latency`` run. The proxy's process tree CPU time (utime + stime
  of the process and all its descendants, from /proc) is read before and after; CPU
  microseconds per request = CPU time / requests completed. Peak RSS of the tree is sampled
  every 0.2 s during the measured run.

Standard library only. A PNG chart is drawn when matplotlib is importable.

The code is the package ``bench/comparison``: ``common`` (variants, scenarios, constants),
``procs`` (/proc, processes, tools), ``peers`` (each proxy's configuration), ``runs`` (wrk
and the benchmark loop), ``report`` (table and run description), ``chart`` and ``cli``.
A new scenario is a ``Variant`` list and a description in ``common``, the peers'
configuration in ``peers``, and its branch in ``runs.Bench``.
"""

from __future__ import annotations

import sys

from comparison.cli import main

if __name__ == "__main__":
    sys.exit(main())
