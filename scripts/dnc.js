// Class 4: reject numbers on a do-not-call list with ConnexCS's 604, pass the rest unchanged.
const DNC = ["447700900123", "447700900999"];

function main(data) {
  if (DNC.includes(data.routing.dest_number)) {
    err([604, "Number on DNC List"]);
  }
  return data;
}
