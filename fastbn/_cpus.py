"""The CPUs this process may really use: its affinity mask and its cgroup's CPU quota.

OpenMP's default thread count is the number of CPUs in the affinity mask (GNU libgomp) or of
the whole machine; neither knows a container's CPU quota. A container given 2 CPUs of a
64-core host would start 64 threads, each running a fraction of the time. fastbn's default is
the smallest of OpenMP's count, the affinity mask and the quota rounded up, as
scikit-learn's and loky's CPU counts are (fastbn/_threads.pyx applies it).

The quota: cgroup v2 ``cpu.max`` ("max 100000" or "<quota> <period>"), cgroup v1
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none), in the process's own cgroup and each
of its ancestors (a limit on a parent holds for its children). Inside a container the cgroup
file system's root is the container's own cgroup, so the root's files are read too.
"""
import math
import os

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"


def affinity_cpus():
    """CPUs in this process's affinity mask (all the machine's where there is no mask)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota_v2(folder):
    """CPUs that cpu.max in folder allows, or None (no file, or no limit)."""
    text = _read(os.path.join(folder, "cpu.max"))
    if not text:
        return None
    fields = text.split()
    try:
        if fields[0] == "max":
            return None
        quota, period = int(fields[0]), int(fields[1]) if len(fields) > 1 else 100000
    except (ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(folder):
    """CPUs that cpu.cfs_quota_us and cpu.cfs_period_us in folder allow, or None."""
    quota, period = (_read(os.path.join(folder, name))
                     for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _folders(mount, path):
    """mount/path and each of its ancestors up to mount, then mount itself."""
    parts = [p for p in path.split("/") if p and p != ".."]
    folders = [os.path.join(mount, *parts[:k]) for k in range(len(parts), 0, -1)]
    return folders + [mount]


def cgroup_cpu_quota(root=CGROUP_ROOT, self_cgroup=PROC_SELF_CGROUP):
    """The CPU quota of this process's cgroups, in CPUs (a float: 1.5 is 150 ms per 100 ms),
    or None where there is none (or no cgroups: not Linux)."""
    text = _read(self_cgroup)
    if text is None:
        return None
    quotas = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":                            # cgroup v2: "0::/path"
            quotas += [_quota_v2(folder) for folder in _folders(root, path)]
        elif "cpu" in controllers.split(","):            # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in (os.path.join(root, controllers), os.path.join(root, "cpu"),
                          os.path.join(root, "cpu,cpuacct")):
                if os.path.isdir(mount):
                    quotas += [_quota_v1(folder) for folder in _folders(mount, path)]
                    break
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def usable_cpus(root=CGROUP_ROOT, self_cgroup=PROC_SELF_CGROUP):
    """[(CPUs, what limits them to that)]: the affinity mask, and the cgroup quota rounded up
    where there is one."""
    affinity = affinity_cpus()
    limits = [(affinity, f"the affinity mask ({affinity} CPUs)")]
    quota = cgroup_cpu_quota(root, self_cgroup)
    if quota is not None:
        limits.append((max(1, math.ceil(quota)), f"the cgroup CPU quota ({quota:g} CPUs)"))
    return limits
