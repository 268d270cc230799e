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

// kinesalite's request handler rethrows any error of the request it reads
// (`req.on('error', function(err) { throw err })`): a client that hangs up in the
// middle of a request (ECONNRESET, "aborted": a killed process, a timeout) would kill
// this process, and with it every process of `make run`. Each request gets that
// handler's listeners, then its own error handler in place of the rethrow: the request
// is dropped, the server goes on. node_modules is installed fresh by `npm ci`, so the
// fix lives here rather than in a patched copy.
const [handleRequest] = server.listeners('request');
server.removeAllListeners('request');
server.on('request', (req, res) => {
  handleRequest(req, res);
  req.removeAllListeners('error');
  req.on('error', (error) => {
    console.error(`kinesalite: request dropped: ${error.code || error.message}`);
    res.destroy();
  });
  res.on('error', (error) => console.error(`kinesalite: response dropped: ${error.code || error.message}`));
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
