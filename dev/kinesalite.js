// Starts kinesalite (a Kinesis-compatible server) bound to 127.0.0.1 only.
// Usage: node dev/kinesalite.js [--port 4567] [--path var/kinesis] [--shard-limit 100]
// Without --path the data lives in memory (tests); with it, every acknowledged
// record survives a restart (`make run`).
'use strict';
const kinesalite = require('kinesalite');

const args = process.argv.slice(2);
function option(name, fallback) {
  const index = args.indexOf(name);
  return index >= 0 ? args[index + 1] : fallback;
}
const port = Number(option('--port', process.env.KINESALITE_PORT || 4567));
const path = option('--path', undefined);
const shardLimit = Number(option('--shard-limit', 100));

const server = kinesalite({
  path,
  createStreamMs: 0,
  deleteStreamMs: 0,
  updateStreamMs: 0,
  shardLimit,
});
server.listen(port, '127.0.0.1', (error) => {
  if (error) {
    console.error(`kinesalite: cannot listen on 127.0.0.1:${port}: ${error.message}`);
    process.exit(1);
  }
  console.log(`kinesalite listening on http://127.0.0.1:${port}` + (path ? ` (data in ${path})` : ' (in memory)'));
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
