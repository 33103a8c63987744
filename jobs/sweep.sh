#!/bin/bash
# A scaling sweep: jobs/bench.slurm once per rank count, one job after the other, then one job
# that gathers their JSON into a table and a plot (python -m mtcoll.bench.gather). Run it where
# sbatch works; it submits, prints the gather job's id and returns (jobs/README.md):
#
#   jobs/sweep.sh 2 4 8 16 32 64                # rank counts (default: 2 4 8 16)
#   MTCOLL_SWEEP_PER_NODE=16 MTCOLL_SBATCH_ARGS="-p short" jobs/sweep.sh 16 32 64
#
# Everything goes to MTCOLL_SWEEP_DIR (default ./mtcoll-sweep-DATE): bench-nN.json, .png and
# -JOBID.out per rank count, sweep.md (the table), sweep.png (busbw against ranks) and
# gather-JOBID.out.
# The bench jobs see this environment (sbatch exports it): MTCOLL_BENCH_ARGS, MTCOLL_VENV,
# MTCOLL_MODULES and MTCOLL_LAUNCH apply to every run, as in jobs/bench.slurm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ranks=("$@")
[ ${#ranks[@]} -gt 0 ] || ranks=(2 4 8 16)
per_node=${MTCOLL_SWEEP_PER_NODE:-}  # ranks per node; unset: bench.slurm's one node
# checked before anything is made or submitted, so that a typo leaves no half sweep behind
for n in "${ranks[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] \
        || { echo "sweep.sh: rank count '$n' is not a positive integer" >&2; exit 2; }
done
[[ -z $per_node || $per_node =~ ^[1-9][0-9]*$ ]] \
    || { echo "sweep.sh: MTCOLL_SWEEP_PER_NODE='$per_node' is not a positive integer" >&2; exit 2; }
dir=${MTCOLL_SWEEP_DIR:-$PWD/mtcoll-sweep-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
extra=(${MTCOLL_SBATCH_ARGS:-})

# One run at a time (afterany: the next runs even if one fails), so that runs never share
# nodes or the network.
ids=() files=() after=()
for n in "${ranks[@]}"; do
    nodes=()
    [ -z "$per_node" ] || nodes=(--nodes=$(( (n + per_node - 1) / per_node )))
    id=$(MTCOLL_OUT="$dir/bench-n$n" sbatch --parsable "${after[@]}" "${extra[@]}" \
         "${nodes[@]}" --ntasks="$n" --job-name="mtcoll-bench-n$n" \
         --output="$dir/bench-n$n-%j.out" "$here/bench.slurm")
    id=${id%%;*}  # --parsable prints JOBID[;CLUSTER]
    ids+=("$id") files+=("$dir/bench-n$n.json") after=(--dependency="afterany:$id")
done

# The gather job runs after all of them; a run that failed shows as missing in the table.
gid=$(sbatch --parsable --dependency="afterany:$(IFS=:; echo "${ids[*]}")" "${extra[@]}" \
      --output="$dir/gather-%j.out" "$here/gather.slurm" "$dir/sweep" "${files[@]}")
gid=${gid%%;*}
echo "sweep: ranks ${ranks[*]}: bench jobs ${ids[*]}, gather job $gid; output in $dir" >&2
echo "$gid"  # alone on stdout, like sbatch --parsable
