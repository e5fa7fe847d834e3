# The rows of a batch, included by _wire.pyx: a row's items checked in the pure-Python
# order and borrowed as C pointers (Row), and a signed row written as its five fields.
# Uses text.pxi, hmac.pxi and base64url.pxi, included before it.

from cpython.object cimport PyObject
from cpythonx cimport (
    PyErr_Clear, as_long, bytearray_data, bytearray_size, bytes_data, bytes_size, is_bool,
    is_bytearray, is_bytes, is_int, is_str, seq_item, seq_size,
)

cdef object _ONE = 1
cdef object _TWO = 2


cdef inline int _action(PyObject *o) noexcept:
    """1 or 2 for a usable action object, else 0 (no exception left set)."""
    cdef int overflow = 0
    cdef long value
    if o == <PyObject *>_ONE:  # CPython caches small ints: the usual case is identity
        return 1
    if o == <PyObject *>_TWO:
        return 2
    if not is_int(o) or is_bool(o):  # True is not "activation"
        return 0
    value = as_long(o, &overflow)
    if value == -1:
        PyErr_Clear()
    if overflow == 0 and (value == 1 or value == 2):
        return <int>value
    return 0


cdef inline const unsigned char *_secret(PyObject *o) noexcept:
    """The 32 bytes of a bytes/bytearray secret, or NULL when unusable."""
    if is_bytes(o):
        if bytes_size(o) == 32:
            return <const unsigned char *>bytes_data(o)
    elif is_bytearray(o):
        if bytearray_size(o) == 32:
            return <const unsigned char *>bytearray_data(o)
    return NULL


cdef tuple _generic_row(Py_ssize_t index, object row):
    """Items 0-4 of a row that is neither a tuple nor a list (len() then indexing)."""
    try:
        size = len(row)
    except TypeError:
        size = -1
    if size < 5:
        raise bad_row_item(index, "row", row)
    return (row[0], row[1], row[2], row[3], row[4])


cdef struct Row:
    # One row of a batch, its items borrowed from the row object.
    TokenInput token  # action, secret, code
    const char *email
    const char *login
    Py_ssize_t email_len
    Py_ssize_t login_len
    unsigned char raw[64]  # the token's bytes, once signed


cdef int _read_row(PyObject *items, Py_ssize_t index, Row *r) except -1:
    """Check a tuple or list row and point ``r`` at its items (no Python code runs,
    but to raise the shared row error)."""
    cdef PyObject *o
    cdef int i
    if seq_size(items) < 5:
        raise bad_row_item(index, "row", <object>items)
    # Check in the pure-Python order so that both raise the same error.
    o = seq_item(items, 0)
    r.token.action = _action(o)
    if r.token.action == 0:
        raise bad_row_item(index, "action", <object>o)
    for i in range(1, 3):
        o = seq_item(items, i)
        if not is_str(o):
            raise bad_row_item(index, ("email", "login")[i - 1], <object>o)
    o = seq_item(items, 3)
    r.token.secret = _secret(o)
    if r.token.secret == NULL:
        raise bad_row_item(index, "secret", <object>o)
    o = seq_item(items, 4)
    if o != <PyObject *>None and not is_str(o):
        raise bad_row_item(index, "code", <object>o)
    r.email = _text(seq_item(items, 1), &r.email_len, index, "email")
    r.login = _text(seq_item(items, 2), &r.login_len, index, "login")
    if o == <PyObject *>None:
        r.token.code, r.token.code_len = b"", 0
    else:
        r.token.code = _text(o, &r.token.code_len, index, "code")
    return 0


cdef inline char *_write_row(char *p, const Row *r) noexcept nogil:
    """Write a signed row's five fields; return the end."""
    p[0] = <char>(48 + r.token.action)  # '1' or '2'
    p[1] = b','
    p = put_field(p + 2, r.email, r.email_len)
    p[0] = b','
    p = put_field(p + 1, r.login, r.login_len)
    p[0] = b','
    p = b64url_64(r.raw, p + 1)
    p[0] = b','
    return put_field(p + 1, r.token.code, r.token.code_len)
