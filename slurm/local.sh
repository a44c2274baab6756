#!/bin/sh
# A one-node SLURM cluster on this machine (Debian's slurm-wlm and munge; run as root, no systemd needed):
# the tests submit real jobs to it, and it is a way to try the cluster path before a real cluster.
#   sudo slurm/local.sh          # idempotent: starts what is not running; `sinfo` then shows the node idle
# Packages: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge (make setup does).
set -e
for tool in slurmctld slurmd munged sbatch; do
    command -v "$tool" >/dev/null || { echo "slurm/local.sh: $tool is not installed" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "slurm/local.sh: run as root (it starts daemons)" >&2; exit 1; }
host=$(hostname -s)
getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >> /etc/hosts

install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged

install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm /run/slurm
install -d /var/spool/slurmd
# The node line as slurmd reports this machine (minus its uptime); no cgroups, no accounting database
# (so no sacct); a requeued job starts again within seconds (cred_expire, scheduler intervals).
node=$(slurmd -C | head -1)
cat > /etc/slurm/slurm.conf.new <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
JobRequeue=1
MailProg=/bin/true
ReturnToService=2
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=2,sched_interval=2
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
if ! cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
    mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
    pkill -x slurmctld || true; pkill -x slurmd || true; sleep 1
else
    rm /etc/slurm/slurm.conf.new
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do  # idle within ~10 s of a cold start
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1)
    case "$state" in idle*|mixed*|allocated*) echo "slurm: node $host $state"; exit 0;; esac
    [ "$state" = "down" ] || [ "$state" = "drained" ] && scontrol update nodename="$host" state=resume 2>/dev/null || true
    sleep 1
done
echo "slurm/local.sh: the node did not become idle (state: $state); see /var/log/slurm/" >&2
exit 1
