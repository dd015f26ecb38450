// Stand-in for Android's org.json (JSONObject, JSONArray, JSONException), enough for the app's
// ModelManifest.parse on the JVM (android_demo/jvm-check): a strict JSON parser and the getters the
// app calls, which throw JSONException for a missing key or a value of another type, as Android's do.
package org.json

class JSONException(message: String) : Exception(message)

class JSONObject internal constructor(internal val map: Map<String, Any?>) {
    constructor(text: String) : this((Parser(text).document() as? JSONObject ?: throw JSONException("not an object")).map)

    private fun value(key: String): Any = map[key] ?: throw JSONException("No value for $key")

    private inline fun <reified T> typed(key: String, what: String): T =
        value(key) as? T ?: throw JSONException("Value at $key is not $what")

    fun has(key: String): Boolean = map.containsKey(key)
    fun getString(key: String): String = typed(key, "a String")
    fun getInt(key: String): Int = typed<Number>(key, "an int").toInt()
    fun getLong(key: String): Long = typed<Number>(key, "a long").toLong()
    fun getDouble(key: String): Double = typed<Number>(key, "a double").toDouble()
    fun getBoolean(key: String): Boolean = typed(key, "a boolean")
    fun getJSONObject(key: String): JSONObject = typed(key, "a JSONObject")
    fun getJSONArray(key: String): JSONArray = typed(key, "a JSONArray")
    fun optJSONArray(key: String): JSONArray? = map[key] as? JSONArray
    fun optJSONObject(key: String): JSONObject? = map[key] as? JSONObject
}

class JSONArray internal constructor(private val items: List<Any?>) {
    fun length(): Int = items.size
    private fun value(i: Int): Any = items.getOrNull(i) ?: throw JSONException("No value at $i")
    fun getString(i: Int): String = value(i) as? String ?: throw JSONException("Value at $i is not a String")
    fun getInt(i: Int): Int = (value(i) as? Number ?: throw JSONException("Value at $i is not an int")).toInt()
    fun getLong(i: Int): Long = (value(i) as? Number ?: throw JSONException("Value at $i is not a long")).toLong()
    fun getDouble(i: Int): Double = (value(i) as? Number ?: throw JSONException("Value at $i is not a double")).toDouble()
    fun getJSONObject(i: Int): JSONObject = value(i) as? JSONObject ?: throw JSONException("Value at $i is not a JSONObject")
}

private class Parser(private val s: String) {
    private var i = 0

    fun document(): Any? = value().also { space(); if (i != s.length) fail("trailing characters") }

    private fun fail(what: String): Nothing = throw JSONException("$what at character $i")

    private fun space() {
        while (i < s.length && s[i].isWhitespace()) i++
    }

    private fun value(): Any? {
        space()
        if (i >= s.length) fail("unexpected end")
        return when (s[i]) {
            '{' -> obj()
            '[' -> arr()
            '"' -> str()
            't' -> word("true", true)
            'f' -> word("false", false)
            'n' -> word("null", null)
            else -> num()
        }
    }

    private fun word(w: String, v: Any?): Any? {
        if (!s.startsWith(w, i)) fail("bad literal")
        i += w.length
        return v
    }

    private fun obj(): JSONObject {
        i++
        val map = LinkedHashMap<String, Any?>()
        space()
        if (s.getOrNull(i) == '}') { i++; return JSONObject(map) }
        while (true) {
            space()
            if (s.getOrNull(i) != '"') fail("expected a key")
            val key = str()
            space()
            if (s.getOrNull(i) != ':') fail("expected ':'")
            i++
            map[key] = value()
            space()
            when (s.getOrNull(i)) {
                ',' -> i++
                '}' -> { i++; return JSONObject(map) }
                else -> fail("expected ',' or '}'")
            }
        }
    }

    private fun arr(): JSONArray {
        i++
        val items = ArrayList<Any?>()
        space()
        if (s.getOrNull(i) == ']') { i++; return JSONArray(items) }
        while (true) {
            items.add(value())
            space()
            when (s.getOrNull(i)) {
                ',' -> i++
                ']' -> { i++; return JSONArray(items) }
                else -> fail("expected ',' or ']'")
            }
        }
    }

    private fun str(): String {
        i++
        val b = StringBuilder()
        while (true) {
            if (i >= s.length) fail("unterminated string")
            val c = s[i++]
            when (c) {
                '"' -> return b.toString()
                '\\' -> {
                    val e = s.getOrNull(i++) ?: fail("bad escape")
                    when (e) {
                        '"', '\\', '/' -> b.append(e)
                        'b' -> b.append('\b')
                        'f' -> b.append('\u000C')
                        'n' -> b.append('\n')
                        'r' -> b.append('\r')
                        't' -> b.append('\t')
                        'u' -> { b.append(s.substring(i, i + 4).toInt(16).toChar()); i += 4 }
                        else -> fail("bad escape")
                    }
                }
                else -> b.append(c)
            }
        }
    }

    private fun num(): Number {
        val start = i
        while (i < s.length && (s[i].isDigit() || s[i] in "+-.eE")) i++
        val t = s.substring(start, i)
        if (t.isEmpty()) fail("unexpected character")
        return t.toLongOrNull() ?: t.toDoubleOrNull() ?: fail("bad number $t")
    }
}
