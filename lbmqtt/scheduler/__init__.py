"""Scheduling policy: queues, priority bands, fairness between users, placement.

Pure: plain data in, decisions out, time passed in; no clocks, no I/O, no MQTT. The
balancer feeds it tasks, node capabilities and observed runtimes, and applies the
placements it returns.

Rules, applied one placement at a time while a free slot can run a queued task:

* **Eligibility.** A slot of a group ``{minP, maxP}`` runs a task of priority ``p`` only if
  ``minP <= p <= maxP`` (pyLoadBalancer's bands: they keep slots free for urgent work). The
  node must implement the task's name, carry all its ``tags``, and have its ``requires``
  (counted resources: ``{"gpu": 1, "memory_mb": 2000}``) free; they are reserved while the
  task is placed. A task no online node could ever run stays queued and
  :meth:`Scheduler.why_waiting` says why; it never holds a slot.
* **Fairness.** Among users with a task some free slot may run, the user with the fewest
  placed tasks goes first (ties: the oldest head task); within a user, higher priority
  first, then oldest (FIFO). A user at ``max_running_per_user`` waits.
* **Placement.** The chosen task goes to the eligible free slot expected to finish it
  soonest: the runtime observed for that task name on that node (moving average), else the
  name's work observed elsewhere over the node's speed, else the typical work of names over
  it; times the task's ``cost`` (a size hint) when given; stretched by the node's load
  beyond its cores. Ties: faster node, emptier node, name, group.
* **Speed.** A node's speed starts at its declared one (a hint) and is learned from every
  task it runs, whatever the name: the name's work as seen on all nodes against its
  runtime there (a name seen for the first time: the typical work, more weakly). So a
  name never seen is expected slower on a slow machine, and a machine that slows down is
  known for it within a few tasks (:class:`~.model.Runtimes`).
* **Pipelining.** A node may be given a *window* (:meth:`Scheduler.set_window`): up to
  ``window`` tasks per slot beyond its free slots, which it holds and starts as slots free,
  so that a slot does not idle while the next assignment travels and the balancer works
  (the balancer sizes it: ``TaskTable.size_window``). Only a task known to be
  short there (expected runtime under ``window_long_s``) takes a place in a window: a long
  one waits for an idle slot, which may open elsewhere first. Every such task is still
  chosen by the rules above; an idle slot is preferred to a place in a window (expected
  finish counts the tasks ahead).
* **Tail.** Given the time, when no more tasks are queued than the cluster has slots, a task
  is not started on a slot if a busy slot that frees soon would finish it in under 80 % of
  the time: it waits for that slot (so the last long task does not land on the slowest
  machine). With a backlog, every free slot that can run a queued task gets one.

* **Stragglers** (:mod:`.stragglers`, asked by the caller after :meth:`Scheduler.schedule`,
  on slots it left idle): a task pipelined to a node and not started is taken back when an
  idle slot elsewhere would finish it clearly sooner (:meth:`Scheduler.take_back`); a
  running task expected to end clearly later where it is than a fresh copy would on an
  idle slot gets a speculative copy there (:meth:`Scheduler.speculate`, LATE-style, from
  its progress rate or its expected runtime; capped to a share of the slots; one copy per
  task; never for ``speculate=False``). The first attempt to end wins; :meth:`release`
  frees both.

Cost: choosing a task looks at each user's best task per (task name, requirement shape)
queue for each free slot class, found by bisection over the distinct priorities and a heap
per priority: it does not grow with the number of queued tasks.

The package: ``model`` (the plain data), ``queues`` (per-user priority queues, placed
tasks), ``core`` (:class:`Scheduler`), ``stragglers`` (take-back and copies).
"""

from __future__ import annotations

from . import model
from .core import Scheduler
from .model import *  # noqa: F403  (model's public names are its __all__, as in asyncio's __init__)

__all__ = ["Scheduler"]
__all__ += model.__all__
