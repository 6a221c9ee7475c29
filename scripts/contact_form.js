// Form: validate a contact form submission and answer the submitter.
export default function (fields) {
  const errors = [];
  if (!fields.name || String(fields.name).trim() === "") errors.push("name is required");
  if (!/^[^@\s]+@[^@\s]+\.[^@\s]+$/.test(fields.email || "")) errors.push("email is invalid");
  if (errors.length) throw [400, errors.join("; ")];
  console.log("contact from", fields.email);
  return { ok: true, message: "Thanks " + String(fields.name).trim() + ", we will call you back." };
}
