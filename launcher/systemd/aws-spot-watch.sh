#!/usr/bin/env bash
# Turn an AWS Spot interruption notice into a graceful ftrain stop.
#
# EC2 publishes the notice in the instance metadata 2 minutes before it stops,
# hibernates or terminates a Spot instance: meta-data/spot/instance-action
# answers 404 until then, and 200 with {"action": ..., "time": ...} after.
# This script polls it every 5 s (IMDSv2: a session token first) and, on the
# first notice, sends SIGTERM to the main process of the training unit only,
# which is `ftrain launch`: every rank saves a final checkpoint and ftrain exits
# 75 within its --grace-seconds. It signals once: a second signal would tell
# ftrain to stop at once. Run it as root (systemctl kill) from
# aws-spot-watch.service.
#
# Settings (environment): SPOT_WATCH_UNIT (default ftrain-train.service),
# SPOT_WATCH_INTERVAL (seconds, default 5).
set -uo pipefail

unit=${SPOT_WATCH_UNIT:-ftrain-train.service}
interval=${SPOT_WATCH_INTERVAL:-5}
imds=http://169.254.169.254/latest
token_ttl=21600   # seconds; the maximum IMDSv2 allows
token=
token_age=0

log() { echo "aws-spot-watch: $*"; }

new_token() {
    token=$(curl -sS --fail --connect-timeout 2 --max-time 5 -X PUT "$imds/api/token" \
                 -H "X-aws-ec2-metadata-token-ttl-seconds: $token_ttl") || token=
    token_age=$SECONDS
    [[ -n $token ]]
}

log "watching $imds/meta-data/spot/instance-action every ${interval}s for $unit"
while :; do
    # Renew the token well before it expires (and after a 401).
    if [[ -z $token ]] || (( SECONDS - token_age > token_ttl - 600 )); then
        if ! new_token; then
            log "cannot get an IMDSv2 token; retrying"
            sleep "$interval"
            continue
        fi
    fi
    # Body and status code in one request; the code is the last line.
    reply=$(curl -s --connect-timeout 2 --max-time 5 -w '\n%{http_code}' \
                 -H "X-aws-ec2-metadata-token: $token" "$imds/meta-data/spot/instance-action")
    code=${reply##*$'\n'}
    body=${reply%$'\n'*}
    case $code in
        200)
            log "interruption notice: $body"
            log "sending SIGTERM to the main process of $unit"
            if systemctl kill --signal=SIGTERM --kill-whom=main "$unit"; then
                log "signal sent; ftrain saves a final checkpoint and exits 75"
            else
                log "could not signal $unit (not running?)"
            fi
            # Done: the instance is going away, and one signal is all ftrain needs.
            exit 0
            ;;
        404) ;;              # no notice
        401) token= ;;       # token expired or rejected: get a new one
        *) log "unexpected answer from the metadata service (HTTP $code); retrying" ;;
    esac
    sleep "$interval"
done
