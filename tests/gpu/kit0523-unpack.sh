#!/usr/bin/env bash
# unpack.sh [SITE]  -- GPU side, copied into each chunk of the 0.5.23 kit by build-0523-kit.sh.
# Extracts this chunk's whole archives into SITE; keeps its pieces (NAME.tar.xz.pKKofMM) in SITE/.kit/pieces and
# extracts a split archive once all MM pieces are there. /tmp lives only while the machine stays warm (~30 s), so
# the chunks go in calls that follow each other at once; the last c-chunk exits 3 if any chunk is missing.
D=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SITE=${1:-${KIT_SITE:-${TMPDIR:-/tmp}/site0523}}
PIECES=$SITE/.kit/pieces
mkdir -p "$PIECES"
t0=$(date +%s.%N)
extract() { xz -dc -T0 | tar -C "$SITE" --no-same-owner -xf -; }
for f in "$D"/*.tar.xz; do
  [ -e "$f" ] || continue
  extract < "$f" || { echo "unpack: FAILED on $f"; exit 1; }
done
done_groups=""
for f in "$D"/*.tar.xz.p*of*; do
  [ -e "$f" ] || continue
  cp "$f" "$PIECES/"
  g=${f##*/}; g=${g%.tar.xz.p*}; n=${f##*of}
  have=$(ls "$PIECES" | grep -c "^$g\.tar\.xz\.p")
  if [ "$have" = "$((10#$n))" ]; then
    cat "$PIECES/$g".tar.xz.p* | extract || { echo "unpack: FAILED on $g"; exit 1; }
    rm -f "$PIECES/$g".tar.xz.p*; done_groups="$done_groups $g"
  fi
done
read -r me _ n < "$D/CHUNK"
cp "$D/CHUNK" "$SITE/.kit/$me"
have=$(ls "$SITE/.kit" | grep -c "^${me:0:1}[0-9]")
waiting=$(ls "$PIECES" | sed 's/\.tar\.xz\.p.*//' | sort -u | tr '\n' ' ')
printf 'unpack: %s into %s in %.1f s; %s of %s %s-chunks present; completed:%s; waiting for pieces of: %s\n' \
  "$me" "$SITE" "$(awk "BEGIN{print $(date +%s.%N)-$t0}")" "$have" "$n" "${me:0:1}" "${done_groups:- none}" "${waiting:-none}"
if [ "$me" = "${me:0:1}$(printf %02d "$n")" ] && [ "$have" -lt "$n" ]; then
  echo "unpack: INCOMPLETE kit in $SITE (the machine went cold?): start again at ${me:0:1}01"; exit 3
fi
exit 0
