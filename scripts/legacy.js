// The legacy ScriptForge form: read input with vars(), answer with exit().
function main() {
  var data = vars();
  data.seen = true;
  exit(data);
}
