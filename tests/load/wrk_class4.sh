# Shared by tests/load/http_run.sh and compare_isolated_vm.sh (sourced, not run).
# wrk_class4_lua FILE: writes a wrk script that POSTs tests/data/five_carriers.json (the
# class4 input of the 5-carrier routing script) and prints one summary line:
# "runs/s N  errors N  non2xx N  p50 Nus  p99 Nus".
wrk_class4_lua() {
  local body
  body=$(tr -d '\n' < tests/data/five_carriers.json | sed 's/\\/\\\\/g; s/"/\\"/g')
  cat > "$1" <<LUA
wrk.method = "POST"
wrk.body = "$body"
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format("runs/s %.0f  errors %d  non2xx %d  p50 %.0fus  p99 %.0fus\n",
    summary.requests / (summary.duration / 1e6),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
LUA
}
